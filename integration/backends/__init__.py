"""The host frameworks a RoutePlan runs on: DeepSpeed's pipeline engine and megatron-core."""
