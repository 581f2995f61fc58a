"""The domain of cbam-nas: attention modules, backbones, the search space and overhead metrics."""
