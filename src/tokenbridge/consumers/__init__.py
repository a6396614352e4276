"""Consumer groups: StreamConsumer loops and the StreamConsumerService that runs them."""
