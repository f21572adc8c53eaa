"""The dispute game: challenges, bisection, bonds, transcripts and replay."""
