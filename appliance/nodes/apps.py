from django.apps import AppConfig


class NodesConfig(AppConfig):
    name = "appliance.nodes"
    label = "nodes"
    verbose_name = "Nodes"
