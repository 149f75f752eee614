#include "auth/check_pool.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace dmz::proxy {

check_pool::check_pool(unsigned threads, std::size_t max_queued) : max_queued_(max_queued) {
    for (unsigned i = 0; i < std::max(1u, threads); ++i) threads_.emplace_back([this] { work(); });
}

bool check_pool::try_submit(std::function<void()> job) {
    {
        std::lock_guard lock(m_);
        if (stopping_ || queue_.size() >= max_queued_) return false;
        queue_.push_back(std::move(job));
    }
    cv_.notify_one();
    return true;
}

std::size_t check_pool::waiting() const {
    std::lock_guard lock(m_);
    return queue_.size();
}

void check_pool::shutdown() {
    std::deque<std::function<void()>> dropped;
    {
        std::lock_guard lock(m_);
        if (stopping_ && threads_.empty()) return;
        stopping_ = true;
        dropped.swap(queue_);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    // `dropped` goes here, on the caller's thread, with the workers stopped.
}

void check_pool::work() {
    // Linux: the niceness of one thread (an unprivileged process may always raise it).
    auto tid = static_cast<id_t>(::gettid());
    errno = 0;
    int nice = ::getpriority(PRIO_PROCESS, tid);
    if (errno == 0) (void)::setpriority(PRIO_PROCESS, tid, std::min(19, nice + 5));
    while (true) {
        std::function<void()> job;
        {
            std::unique_lock lock(m_);
            cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
            if (stopping_) return;
            job = std::move(queue_.front());
            queue_.pop_front();
        }
        job();
    }
}

}  // namespace dmz::proxy
