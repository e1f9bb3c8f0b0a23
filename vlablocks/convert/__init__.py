"""Converting policies released in other toolkits' layouts: LeRobot's state-dict keys
(:mod:`.lerobot_keys`)."""
