#include "auth/check_pool.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace dmz::proxy {

check_pool::check_pool(unsigned threads, std::size_t max_queued, std::chrono::milliseconds max_wait)
    : max_queued_(max_queued), max_wait_(max_wait) {
    for (unsigned i = 0; i < std::max(1u, threads); ++i) threads_.emplace_back([this] { work(); });
}

bool check_pool::try_submit(std::function<void()> f) {
    return enqueue([f = std::move(f)](bool) { f(); });  // runs however long it waited
}

bool check_pool::enqueue(job j) {
    {
        std::lock_guard lock(m_);
        if (stopping_ || queue_.size() >= max_queued_) return false;
        queue_.emplace_back(std::move(j), std::chrono::steady_clock::now());
    }
    cv_.notify_one();
    return true;
}

std::size_t check_pool::waiting() const {
    std::lock_guard lock(m_);
    return queue_.size();
}

void check_pool::shutdown() {
    std::deque<std::pair<job, std::chrono::steady_clock::time_point>> dropped;
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
    // Linux: the niceness of this thread alone (an unprivileged process may always raise
    // it). At 10 an event loop of this process that wakes up gets about nine tenths of a
    // shared core; at 19 the checks starved behind any other niced work on the machine (a
    // background build took 15 s per password).
    (void)::setpriority(PRIO_PROCESS, static_cast<id_t>(::gettid()), 10);
    while (true) {
        job j;
        bool fresh = true;
        {
            std::unique_lock lock(m_);
            cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
            if (stopping_) return;
            j = std::move(queue_.front().first);
            fresh = std::chrono::steady_clock::now() - queue_.front().second <= max_wait_;
            queue_.pop_front();
        }
        j(fresh);
    }
}

}  // namespace dmz::proxy
