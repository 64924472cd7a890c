"""Test-time adaptation stacked on a soup: SAR and Tent, and the online stream runner.
"""
