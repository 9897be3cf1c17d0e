"""The appliance's own certificate authority: server and client certificates, the CRL, PSK.

Services in ``services.py``; the engine reads the files ``engine_tls_spec()`` writes.
"""
