"""Infrastructure every step uses: the step registry (steps) and option catalogue (options), configs
(config), recipes and per-data-set optimiser settings (recipe), processes (distributed), artifact
paths (paths), run records and fingerprints (records), locks (locks), strict artifact loading
(artifacts), atomic I/O (io), downloads (download), backbone files named by arch (backbone_files)
and prediction pictures (pictures). Nothing here imports utils.engine, utils.tools or utils.cli."""
