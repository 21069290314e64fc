"""Infrastructure every step uses: options (config), the command-line entry (cli), processes
(distributed), artifact paths (paths), run records and fingerprints (records), strict artifact
loading (artifacts), atomic I/O (io), downloads (download), backbone files named by arch
(backbone_files) and prediction pictures (pictures)."""
