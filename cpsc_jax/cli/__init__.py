"""The command-line tools (console scripts cpsc-train, cpsc-train-teacher, cpsc-convert-teacher,
cpsc-export-student, cpsc-evaluate, cpsc-benchmark, cpsc-ablate; scripts/*.py call the same)."""
