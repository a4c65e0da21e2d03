# Read by scripts/llama-deps.sh's llama.cpp build (CMAKE_PROJECT_INCLUDE), which compiles in
# unity mode (CMAKE_UNITY_BUILD=ON: several .cpp files per compiler run, so the headers that
# every one of llama.cpp's 157 model files includes are parsed once per batch, not per file).
# One target cannot be built that way: mtmd's public helper (tools/mtmd/mtmd-helper.cpp) stops
# with `#error "mtmd-helper is a public library outside of mtmd. it must not include internal
# headers"` when it lands in a batch with mtmd's own sources. The call is deferred to the end of
# the top-level directory, after tools/mtmd has defined the target.
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL set_target_properties mtmd PROPERTIES UNITY_BUILD OFF)
