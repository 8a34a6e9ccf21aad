"""The control plane on Kafka: the desired state every worker applies (today: the rules
and their blocklists), published to a compacted topic with its audit trail."""
