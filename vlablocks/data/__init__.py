"""Datasets in LeRobot's on-disk layout, v3.0 and v2.1: the layout and frame encodings
(:mod:`.format`), writing (:mod:`.writer`, :mod:`.layouts`, :mod:`.video_writer`), the metadata
(:mod:`.meta`), the frame table (:mod:`.table`), frames on demand (:mod:`.frames`, :mod:`.video`),
resizing (:mod:`.resize`) and the policy's samples (:mod:`.reader`); Hub dataset ids:
:func:`vlablocks.io.hub.resolve_dataset`."""

from vlablocks.data.format import ACTION, STATE, camera_columns
from vlablocks.data.reader import DataSelection, LeRobotDataset
from vlablocks.data.table import EpisodeError
from vlablocks.data.writer import DatasetWriter

__all__ = ["ACTION", "STATE", "DataSelection", "DatasetWriter", "EpisodeError", "LeRobotDataset", "camera_columns"]
