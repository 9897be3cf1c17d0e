from django.apps import AppConfig


class ExportsConfig(AppConfig):
    name = "appliance.exports"
    label = "exports"
    verbose_name = "NBD exports"
