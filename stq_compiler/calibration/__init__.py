"""Calibration: statistics gathered from calibration data, and the transforms and roundings fitted to them."""
