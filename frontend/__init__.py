"""The web dashboard: server-rendered pages over the appliance's services and selectors."""
