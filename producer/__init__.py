"""The producer: receive pass events from every source, validate, normalize, deduplicate, enqueue."""
