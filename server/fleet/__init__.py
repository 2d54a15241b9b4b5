"""Scale-out on Ray Serve (docs/design.md §7): replicas of the whole server behind Ray Serve's gRPC proxy,
adapters as multiplexed models for affinity, every replica on the shared registry. See docs/fleet.md."""
