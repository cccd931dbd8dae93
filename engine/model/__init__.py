"""Our own forward pass of Mistral Small 4: MLA attention, MoE, YaRN rope, vision."""
