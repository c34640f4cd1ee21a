"""The run's configuration: typed sections for a whole run, loaded from YAML plus `key=value`
overrides and validated once at the door (`load_config`), the batch arithmetic, and which changes
a resume may take."""
