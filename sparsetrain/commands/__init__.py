"""Command-line commands that live beside their feature; ``sparsetrain.cli`` registers them."""
