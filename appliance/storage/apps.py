from django.apps import AppConfig


class StorageConfig(AppConfig):
    name = "appliance.storage"
    label = "storage"
    verbose_name = "Storage"
