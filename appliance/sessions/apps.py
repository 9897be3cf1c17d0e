from django.apps import AppConfig


class ClientSessionsConfig(AppConfig):
    """Client sessions. Labelled ``clientsessions``: ``sessions`` is django.contrib.sessions."""

    name = "appliance.sessions"
    label = "clientsessions"
    verbose_name = "Client sessions"
