"""Datasets in LeRobot's on-disk layout: reading (episodes, frames, action chunks) and writing."""
