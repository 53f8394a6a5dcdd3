"""One LightningModule per method; each is selected by its ``conf/method/<name>.yaml``."""
