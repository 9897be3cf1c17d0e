"""The bridge between the appliance and nbdcore.

The node's Celery engine worker owns one engine process (``runner``) through a worker
bootstep (``supervisor``). Short idempotent tasks (``tasks``) write the exports the node
should serve into Redis (``mailbox``); the engine applies them without dropping clients of
unchanged exports, and reports heartbeats, live counters and sessions (``metrics``).
"""
