"""Native runtime plugins edgellm builds for TVM's runtime (the WebGPU/Vulkan device: webgpu_plugin)."""
