"""Datasets in LeRobot's on-disk layout: the layout and frame encodings (:mod:`.format`),
writing (:mod:`.writer`) and reading into the policy's batch keys (:mod:`.reader`)."""

from vlablocks.data.format import ACTION, STATE, camera_columns
from vlablocks.data.reader import LeRobotDataset
from vlablocks.data.table import EpisodeError
from vlablocks.data.writer import DatasetWriter

__all__ = ["ACTION", "STATE", "DatasetWriter", "EpisodeError", "LeRobotDataset", "camera_columns"]
