"""Where the traffic comes from: the demo generator, malformed records, the CSV source,
the producer and labelled histories."""
