"""Procedural 4D scene simulator: scenes, motion, camera and renderer."""
