"""Plug-ins for other training libraries. ``trl``: TTRV's rewards as reward functions for TRL's GRPOTrainer (needs the
``trl`` extra). Nothing is imported here.
"""
