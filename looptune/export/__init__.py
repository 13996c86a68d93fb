"""From a measured setting to a deployment.

deployable: the profile file (`Profile`, read / write / check); engines: each serving engine's
facts, read from its source; serving: `export_profile`, one engine's config for a profile;
weights: a servable copy of a checkpoint; runtime: looptune's own runner for a profile.
"""
