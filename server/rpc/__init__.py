"""The gRPC door: the hotlora.v1 servicers (Inference, Adapters, Training) and the KServe v2 door, their
wire <-> domain conversion, and what every call passes first: the interceptor (auth, admission.py, error
statuses), the idle-call watchdog and the transport limits. The only place with *_pb2 types."""
