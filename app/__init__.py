"""Quire's Qt front end: never imports torch."""
