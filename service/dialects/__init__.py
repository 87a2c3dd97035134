"""Dialects: the seeds' own wire formats, translated at the edge onto Eddy's one pipeline.

A dialect never has its own hub, store, rules or resume: it decodes a client's
frames into Eddy's operations and renders Eddy's events into the client's
frames, once per event per dialect (``PreparedMessage.rendered``). See
docs/DIALECTS.md.

* :mod:`.engineio` and :mod:`.socketio`: the Engine.IO v4 and Socket.IO v5 packet codecs
* :mod:`.templates`: ``{field}`` templates over payloads and tokens
* :mod:`.mapping`: the ``[socketio]`` config tables: which client event does what
* :mod:`.renderers`: events in each dialect's wire format, once per dialect
* :mod:`.recovery`: Socket.IO connection state recovery records, kept in the store
"""
