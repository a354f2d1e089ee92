"""What the coordinator and the sites both need: config, model, PEFT methods, data, metrics."""
