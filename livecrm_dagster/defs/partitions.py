"""The one partitions definition: a dynamic partition per broadcast."""

import dagster as dg

broadcast_partitions = dg.DynamicPartitionsDefinition(name="broadcast")
