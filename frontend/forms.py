"""Dashboard forms: they parse what people type; the services decide what is allowed.

A service's refusal (Django's ``ValidationError`` with field messages, or an
``ApplianceError`` naming its ``field``) is put beside the field it is about by
``call_service``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from django import forms
from django.core.exceptions import ValidationError

from appliance.config import parse_size
from appliance.errors import ApplianceError
from appliance.exports.models import TlsPolicy
from appliance.storage.models import Image

T = TypeVar("T")


def call_service(
    form: forms.Form, service: Callable[..., T], *, fields: dict[str, str] | None = None,
    **kwargs: Any,
) -> T | None:
    """``service(**kwargs)``, or ``None`` with its refusal added to ``form``'s errors.

    ``fields`` renames a service's field to the form's (the import form's ``file`` is the
    service's ``size``); messages about fields the form lacks go to the top of the form.
    """
    rename = fields or {}

    def place(field: str | None, messages: list[str]) -> None:
        name = rename.get(field or "", field)
        for message in messages:
            form.add_error(name if name in form.fields else None, message)

    try:
        return service(**kwargs)
    except ValidationError as exc:
        if hasattr(exc, "error_dict"):
            for field, messages in exc.message_dict.items():
                place(None if field == "__all__" else field, messages)
        else:
            place(None, exc.messages)
    except ApplianceError as exc:
        place(exc.field, [exc.message])
    return None


class SizeField(forms.Field):
    """A size as people write it: ``10G``, ``512M``, ``1 GiB`` or bytes (binary units)."""

    widget = forms.TextInput

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("help_text", "bytes, or a number with K, M, G, T (binary units)")
        super().__init__(**kwargs)
        self.widget.attrs.update(placeholder="10G", maxlength="32", autocomplete="off")

    def to_python(self, value: Any) -> int | None:
        text = str(value or "").strip()[:64]
        if not text:
            return None
        try:
            return parse_size(text)
        except ValueError as exc:
            raise ValidationError(
                "%(value)r is not a size: write bytes or a number with K, M, G, T or P, "
                "like 10G or 512M",
                code="invalid_size",
                params={"value": text},
            ) from exc


_NAME_ATTRS = {"autocomplete": "off", "spellcheck": "false"}


_SEPARATORS_LABELS = re.compile(r"[\s,;]+")


class LabelsField(forms.CharField):
    """Node labels separated by commas or spaces; the placement service checks them."""

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        text = super().to_python(value) or ""
        return [part for part in _SEPARATORS_LABELS.split(text) if part]

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return ", ".join(value)
        return value


class PlacementMixin(forms.Form):
    """Where a new image goes: a node that is up, or any node with the labels given."""

    node = forms.CharField(
        required=False, label="Node", widget=forms.Select,
        help_text="leave automatic to use the node with the most free space")
    labels = LabelsField(
        required=False, label="Node labels", max_length=1024,
        widget=forms.TextInput(attrs={"placeholder": "ssd, rack=a2", **_NAME_ATTRS}),
        help_text="automatic placement only considers nodes having all of these")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from appliance.nodes.selectors import nodes_up

        from .templatetags.dashboard import size

        choices = [("", "automatic (most free space)")]
        for node in nodes_up():
            labels = f" [{', '.join(node.labels)}]" if node.labels else ""
            choices.append((node.name, f"{node.name}: {size(node.free_bytes)} free{labels}"))
        self.fields["node"].widget.choices = choices


class ImageCreateForm(PlacementMixin, forms.Form):
    name = forms.CharField(max_length=128, widget=forms.TextInput(attrs=_NAME_ATTRS))
    size = SizeField()
    description = forms.CharField(max_length=1024, required=False)
    field_order = ["name", "size", "description", "node", "labels"]


class ImageGrowForm(forms.Form):
    size = SizeField(label="New size")
    force = forms.BooleanField(
        required=False, label="Allow shrinking (discards data past the new end)"
    )


class ImageCloneForm(forms.Form):
    name = forms.CharField(max_length=128, label="Clone name",
                           widget=forms.TextInput(attrs=_NAME_ATTRS))
    description = forms.CharField(max_length=1024, required=False)


class ImageMoveForm(forms.Form):
    """Another node that is up, for the image's file and exports."""

    node = forms.ChoiceField(label="Move to node", choices=())

    def __init__(self, *args: Any, current: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from appliance.nodes.selectors import nodes_up

        from .templatetags.dashboard import size

        self.fields["node"].choices = [
            (node.name, f"{node.name}: {size(node.free_bytes)} free")
            for node in nodes_up() if node.name != current]


class ImageImportForm(PlacementMixin, forms.Form):
    name = forms.CharField(max_length=128, widget=forms.TextInput(attrs=_NAME_ATTRS))
    file = forms.FileField(label="Raw image file",
                           help_text="a raw disk image; all-zero blocks become holes")
    description = forms.CharField(max_length=1024, required=False)
    field_order = ["name", "file", "description", "node", "labels"]


_SEPARATORS = re.compile(r"[\s,;]+")


class NetworksField(forms.CharField):
    """CIDR networks separated by commas, spaces or new lines; the service checks them."""

    widget = forms.Textarea(attrs={"rows": 2, "placeholder": "192.0.2.0/24, 2001:db8::/32"})

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        text = super().to_python(value) or ""
        return [part for part in _SEPARATORS.split(text) if part]

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return ", ".join(value)
        return value


class NamesField(NetworksField):
    """Client names separated by commas, spaces or new lines; the service checks them."""

    widget = forms.Textarea(attrs={"rows": 2, "placeholder": "backup01, alice@example.org",
                                   "spellcheck": "false"})


class DefaultingChoiceField(forms.ChoiceField):
    """A choice that may be left out: then it is ``initial``."""

    def clean(self, value: Any) -> Any:
        return super().clean(value) or self.initial


class DefaultingIntegerField(forms.IntegerField):
    def clean(self, value: Any) -> Any:
        cleaned = super().clean(value)
        return self.initial if cleaned is None else cleaned


def _tls_policy() -> forms.ChoiceField:
    return DefaultingChoiceField(
        choices=TlsPolicy.choices, initial=TlsPolicy.OFF, required=False, label="TLS",
        help_text="required: clients must use TLS (nbds://); optional: both are offered",
    )


def _allowed_clients() -> NamesField:
    return NamesField(
        required=False, label="Allowed clients",
        help_text="names in client certificates (or PSK identities); TLS only; empty allows "
        "every client",
    )


def _max_connections() -> forms.IntegerField:
    return DefaultingIntegerField(
        min_value=0, initial=0, required=False, label="Connection limit",
        help_text="clients connected at once; 0 means no limit",
        widget=forms.NumberInput(attrs={"min": 0}),
    )


class ExportCreateForm(forms.Form):
    name = forms.CharField(
        max_length=255, widget=forms.TextInput(attrs=_NAME_ATTRS),
        help_text="what clients put after nbd://host/",
    )
    image = forms.ModelChoiceField(queryset=Image.objects.order_by("name"),
                                   empty_label="choose an image")
    description = forms.CharField(max_length=1024, required=False)
    read_only = forms.BooleanField(required=False, label="Read-only")
    multi_conn = forms.BooleanField(required=False, initial=True, label="Multi-conn",
                                    help_text="clients may open several connections")
    allowed_networks = NetworksField(
        required=False, label="Allowed networks",
        help_text="CIDR networks; empty allows every client",
    )
    tls_policy = _tls_policy()
    allowed_clients = _allowed_clients()
    max_connections = _max_connections()
    enabled = forms.BooleanField(required=False, initial=True, label="Enabled")


class ExportAccessForm(forms.Form):
    """Who may use an export: changed in place (only refused clients are disconnected)."""

    allowed_networks = NetworksField(
        required=False, label="Allowed networks",
        help_text="CIDR networks; empty allows every client",
    )
    tls_policy = _tls_policy()
    allowed_clients = _allowed_clients()
    max_connections = _max_connections()


# ------------------------------------------------------------------ security (TLS)


class ClientCertificateForm(forms.Form):
    name = forms.CharField(
        max_length=64, label="Client name", widget=forms.TextInput(attrs=_NAME_ATTRS),
        help_text="the certificate's name (CN), as exports' allowed clients list it",
    )
    days = forms.IntegerField(min_value=1, max_value=3650, initial=365, label="Valid for (days)",
                              widget=forms.NumberInput(attrs={"min": 1, "max": 3650}))


class PskIdentityForm(forms.Form):
    name = forms.CharField(
        max_length=64, label="Identity", widget=forms.TextInput(attrs=_NAME_ATTRS),
        help_text="the PSK identity, as exports' allowed clients list it",
    )
