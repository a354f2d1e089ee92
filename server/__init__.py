"""The coordinator side: ServerApp, round loop, aggregation, validation and the run store."""
