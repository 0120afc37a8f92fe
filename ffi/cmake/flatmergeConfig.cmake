# CMake package config of flatmerge's C API, installed by ffi/install.sh
# into PREFIX/lib/cmake/flatmerge/. Relocatable: the prefix is found from
# this file's location.
#
#   find_package(flatmerge REQUIRED)
#   target_link_libraries(app PRIVATE flatmerge::flatmerge)         # shared
#   target_link_libraries(app PRIVATE flatmerge::flatmerge_static)  # static
get_filename_component(_flatmerge_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(flatmerge_INCLUDE_DIRS "${_flatmerge_prefix}/include")

if(NOT TARGET flatmerge::flatmerge)
  add_library(flatmerge::flatmerge SHARED IMPORTED)
  set_target_properties(flatmerge::flatmerge PROPERTIES
    IMPORTED_LOCATION "${_flatmerge_prefix}/lib/libflatmerge.so"
    IMPORTED_SONAME "libflatmerge.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_flatmerge_prefix}/include")
endif()

if(NOT TARGET flatmerge::flatmerge_static AND EXISTS "${_flatmerge_prefix}/lib/libflatmerge.a")
  find_package(Threads REQUIRED)
  add_library(flatmerge::flatmerge_static STATIC IMPORTED)
  set_target_properties(flatmerge::flatmerge_static PROPERTIES
    IMPORTED_LOCATION "${_flatmerge_prefix}/lib/libflatmerge.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_flatmerge_prefix}/include"
    INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m;rt;util;gcc_s")
endif()

set(flatmerge_LIBRARIES flatmerge::flatmerge)
set(flatmerge_FOUND TRUE)
unset(_flatmerge_prefix)
