"""Parallelism as transforms of the single-device model: expert parallelism (chapter 3), pipeline schedules and runtime (chapter 5)."""
