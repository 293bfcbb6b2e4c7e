"""Parallelism as transforms of the single-device model.

Expert parallelism (chapter 3); pipeline schedules, simulator and runtime (chapter 5).
"""
