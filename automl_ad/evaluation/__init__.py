"""How a detector is judged: image and pixel metrics, validation sets and the objective."""
