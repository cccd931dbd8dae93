"""Quire's inference engine: owns torch and every GPU; never imports Qt."""
