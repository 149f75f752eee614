#include "net/parking.hpp"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>

namespace dmz::proxy {

namespace {
constexpr std::chrono::milliseconds sweep_period{250};
}

parking_lot::parking_lot(net::asio::io_context& io) : io_(io), epoll_(io), sweeper_(io, *this) {
    epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (epfd_ < 0) throw std::runtime_error("epoll_create1 failed");
    epoll_.assign(epfd_);
}

parking_lot::~parking_lot() {
    for (std::uint32_t i = 0; i < used_; ++i)
        if (at(i).fd >= 0) {
            auto c = take(i);
            close(c);
        }
    // epoll_ (a stream_descriptor) closes epfd_.
}

std::uint16_t parking_lot::intern(const std::string& name) {
    auto it = std::find(names_.begin(), names_.end(), name);
    if (it != names_.end()) return static_cast<std::uint16_t>(it - names_.begin());
    names_.push_back(name);
    return static_cast<std::uint16_t>(names_.size() - 1);
}

bool parking_lot::park(parked_connection&& c) {
    if (names_.size() >= UINT16_MAX - 2) return false;  // (reloads renaming listeners thousands of times)
    std::uint32_t i;
    if (free_head_ != UINT32_MAX) {
        i = free_head_;
    } else {
        if (used_ == capacity_) {
            blocks_.push_back(std::make_unique<slot[]>(block_size));
            capacity_ += block_size;
        }
        i = used_;
    }
    // Level-triggered: bytes that came in while the connection changed hands still wake it.
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.u32 = i;
    if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, c.fd, &ev) != 0) return false;
    if (i == free_head_) free_head_ = at(i).next_free;
    else ++used_;
    slot& s = at(i);
    s.fd = c.fd;
    s.v6 = c.v6;
    s.proto = c.proto;
    s.endpoint = intern(c.endpoint);
    s.counted_as = intern(c.counted_as);
    s.tls = std::move(c.tls);
    s.id = c.id;
    s.peer = c.peer;
    s.expires = c.expires;
    c.fd = -1;
    ++count_;
    if (stats) stats->parked(1);
    watch();
    if (!sweeper_.armed()) sweeper_.arm(sweep_period);
    return true;
}

parked_connection parking_lot::take(std::uint32_t i) {
    slot& s = at(i);
    parked_connection c;
    c.fd = s.fd;
    c.v6 = s.v6;
    c.proto = s.proto;
    c.tls = std::move(s.tls);
    c.id = s.id;
    c.peer = s.peer;
    c.endpoint = names_[s.endpoint];
    c.counted_as = names_[s.counted_as];
    c.expires = s.expires;
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, s.fd, nullptr);
    s.fd = -1;
    s.next_free = free_head_;
    free_head_ = i;
    --count_;
    if (stats) stats->parked(-1);
    if (count_ == 0) {
        // Nothing parked: give the memory of a burst back.
        blocks_.clear();
        blocks_.shrink_to_fit();
        capacity_ = used_ = 0;
        free_head_ = UINT32_MAX;
        sweeper_.disarm();
    }
    return c;
}

void parking_lot::watch() {
    if (watching_ || count_ == 0) return;
    watching_ = true;
    epoll_.async_wait(net::asio::posix::stream_descriptor::wait_read, [this](const net::error_code& ec) {
        watching_ = false;
        if (ec) return;  // the lot is going away
        ready();
        watch();
    });
}

void parking_lot::ready() {
    epoll_event evs[128];
    int n = ::epoll_wait(epfd_, evs, 128, 0);
    for (int k = 0; k < n; ++k) {
        std::uint32_t i = evs[k].data.u32;
        if (i >= used_ || at(i).fd < 0) continue;
        auto c = take(i);
        if (on_wake) on_wake(std::move(c));
        else close(c);
    }
}

void parking_lot::close(parked_connection& c) {
    if (c.fd < 0) return;
    ::shutdown(c.fd, SHUT_RDWR);
    ::close(c.fd);
    c.fd = -1;
    c.tls.reset();
    if (on_close) on_close(c);
}

void parking_lot::close_all() {
    for (std::uint32_t i = 0; i < used_; ++i) {
        if (at(i).fd < 0) continue;
        auto c = take(i);
        close(c);
    }
}

void parking_lot::sweeper::fire() {
    // Runs inside the deadline ticker: the sweep itself is posted.
    net::asio::post(lot.io_, [&lot = lot] { lot.sweep(); });
}

void parking_lot::sweep() {
    auto now = std::chrono::steady_clock::now();
    for (std::uint32_t i = 0; i < used_; ++i) {
        if (at(i).fd < 0 || at(i).expires > now) continue;
        auto c = take(i);
        close(c);
    }
    if (count_ > 0) sweeper_.arm(sweep_period);
}

}  // namespace dmz::proxy
