"""A task's images as the runs see them: decoded once into uint8 arrays (`arrays`), and VTAB-1k's download and
installation (`vtab`). The tasks themselves and their sources are the top-level `tasks` package."""
