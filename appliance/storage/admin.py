"""Images in the Django admin: every change goes through the storage services."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from appliance.errors import ApplianceError, human_size

from .models import Image
from .remote import is_local
from .selectors import with_usage
from .services import (
    image_check_create,
    image_check_grow,
    image_create,
    image_delete,
    image_grow,
    image_update,
)


def _size(image: Image, size: int | None) -> str:
    if size is not None:
        return human_size(size)
    return "file missing" if is_local(image.node) else f"not measured by {image.node} yet"


class ImageAdminForm(forms.ModelForm):
    force_shrink = forms.BooleanField(
        required=False, help_text="confirm a smaller size: the data past the new end is lost"
    )

    class Meta:
        model = Image
        fields = ["name", "description", "size"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if self.errors:
            return data
        try:
            if self.instance.pk is None:
                image_check_create(name=data["name"], size=data["size"])
            elif "size" in self.changed_data:
                current = Image.objects.get(pk=self.instance.pk)
                image_check_grow(image=current, size=data["size"], force=data["force_shrink"])
        except ApplianceError as exc:
            raise forms.ValidationError({exc.field or "size": exc.message}) from exc
        return data


@admin.register(Image)
class ImageAdmin(admin.ModelAdmin):
    form = ImageAdminForm
    list_display = ["name", "node", "virtual", "allocated", "export_names", "cloned_from",
                    "created_at"]
    list_filter = ["node"]
    search_fields = ["name", "description"]
    readonly_fields = ["node", "filename", "cloned_from", "virtual", "allocated", "created_at",
                       "updated_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Image]:
        return with_usage(super().get_queryset(request).prefetch_related("exports"))

    @admin.display(description="virtual size")
    def virtual(self, image: Image) -> str:
        return _size(image, image.usage.virtual_size)

    @admin.display(description="allocated")
    def allocated(self, image: Image) -> str:
        return _size(image, image.usage.allocated_size)

    @admin.display(description="exports")
    def export_names(self, image: Image) -> str:
        return ", ".join(e.name for e in image.exports.all())

    def save_model(self, request: HttpRequest, obj: Image, form: Any, change: bool) -> None:
        if not change:
            created = image_create(name=obj.name, size=obj.size, description=obj.description)
            for field in Image._meta.concrete_fields:
                setattr(obj, field.attname, getattr(created, field.attname))
            return
        grow = "size" in form.changed_data
        force = form.cleaned_data["force_shrink"]
        if grow and not is_local(obj.node):
            # On another host, grow first: the admin's transaction would otherwise hold the
            # row image_update saved while the image's node waits to lock it.
            image_grow(image=obj, size=obj.size, force=force)
            grow = False
        image_update(image=obj, name=obj.name, description=obj.description)
        if grow:
            image_grow(image=obj, size=obj.size, force=force)

    def delete_model(self, request: HttpRequest, obj: Image) -> None:
        image_delete(image=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Image]) -> None:
        for image in queryset:
            image_delete(image=image)
