from django.apps import AppConfig


class PkiConfig(AppConfig):
    name = "appliance.pki"
    label = "pki"
    verbose_name = "TLS certificates"
