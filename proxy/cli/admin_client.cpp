// A small HTTP/1.1 client for the instances' admin endpoints (reload, diagnose's probes).
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "commands.hpp"

namespace dmz::cli {

namespace {

/// "http://HOST:PORT[/...]" -> host, port. Only plain http: the admin endpoint is local.
bool split_url(const std::string& url, std::string& host, std::string& port) {
    const std::string scheme = "http://";
    if (url.rfind(scheme, 0) != 0) return false;
    auto rest = url.substr(scheme.size());
    rest = rest.substr(0, rest.find('/'));
    auto colon = rest.rfind(':');
    if (colon == std::string::npos || colon + 1 == rest.size()) return false;
    host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    return !host.empty();
}

/// A connected socket with send/receive deadlines, or -1 with `err` set.
int connect_admin(const std::string& url, double timeout, std::string& host, std::string& port, std::string& err) {
    if (!split_url(url, host, port)) {
        err = "'" + url + "' is not http://HOST:PORT";
        return -1;
    }
    addrinfo hints{}, *res = nullptr;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || !res) {
        err = "'" + host + "' is not an IP address";
        return -1;
    }
    int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    timeval tv{static_cast<time_t>(timeout), 0};
    if (fd >= 0) {
        ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    if (fd < 0 || ::connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
        err = "cannot connect to " + url + ": " + std::strerror(errno) + " (is the instance running with an admin endpoint there?)";
        freeaddrinfo(res);
        if (fd >= 0) ::close(fd);
        return -1;
    }
    freeaddrinfo(res);
    return fd;
}

}  // namespace

bool read_token_file(const std::string& file, std::string& token) {
    std::ifstream f(file);
    if (!f || !std::getline(f, token)) return false;
    while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
    while (!token.empty() && std::isspace(static_cast<unsigned char>(token.front()))) token.erase(0, 1);
    return true;
}

admin_reply admin_call(const std::string& url, const std::string& method, const std::string& target, const std::string& token,
                       double timeout) {
    admin_reply r;
    std::string host, port;
    int fd = connect_admin(url, timeout, host, port, r.error);
    if (fd < 0) return r;
    std::string req = method + " " + target + " HTTP/1.1\r\nHost: " + host + ":" + port + "\r\nContent-Length: 0\r\n" +
                      (token.empty() ? "" : "Authorization: Bearer " + token + "\r\n") + "Connection: close\r\n\r\n";
    if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
        r.error = std::string("sending the request failed: ") + std::strerror(errno);
        ::close(fd);
        return r;
    }
    std::string got;
    char buf[4096];
    ssize_t n;
    while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) got.append(buf, static_cast<std::size_t>(n));
    ::close(fd);
    auto end = got.find("\r\n\r\n");
    if (got.rfind("HTTP/1.1 ", 0) != 0 || end == std::string::npos) {
        r.error = "no answer from " + url + (n < 0 ? std::string(": ") + std::strerror(errno) : std::string());
        return r;
    }
    r.status = std::atoi(got.c_str() + 9);
    r.body = nlohmann::json::parse(got.substr(end + 4), nullptr, false);
    return r;
}

}  // namespace dmz::cli
