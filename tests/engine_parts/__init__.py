"""Tests of the engine parts: retention, quota rotation and the image tracker."""
