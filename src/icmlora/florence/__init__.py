"""Florence-2: the detection format and its parser, the model, batched prediction, hidden states."""
