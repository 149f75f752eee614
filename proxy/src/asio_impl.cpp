// The one translation unit that compiles Boost.Asio (and its SSL part) for the whole project.
#include <utility>  // before any Asio header with GCC 12 (awaitable.hpp)

#include <boost/asio/impl/src.hpp>
#include <boost/asio/ssl/impl/src.hpp>
