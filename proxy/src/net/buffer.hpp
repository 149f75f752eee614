#pragma once
// A flat byte buffer with a read window, for heads and body pumps.
#include <cstring>
#include <memory>
#include <string_view>
#include <utility>

namespace dmz::proxy {

/// Recycled 4 KiB blocks, per thread (a worker is one thread): a connection that goes idle
/// gives its head buffer back, and the next request takes it again, with no trip through
/// malloc for a block too large for its per-thread cache. At most `keep` blocks wait here.
class block_cache {
public:
    static constexpr std::size_t block = 4096, keep = 64;
    static std::unique_ptr<char[]> take() {
        auto& c = cache();
        if (c.count == 0) return std::make_unique_for_overwrite<char[]>(block);
        return std::move(c.blocks[--c.count]);
    }
    static void give(std::unique_ptr<char[]> b) {
        auto& c = cache();
        if (c.count < keep) c.blocks[c.count++] = std::move(b);
    }

private:
    struct store {
        std::unique_ptr<char[]> blocks[keep];
        std::size_t count = 0;
    };
    static store& cache() {
        thread_local store s;
        return s;
    }
};

class flat_buffer {
public:
    explicit flat_buffer(std::size_t initial = 0) { reserve(initial); }
    ~flat_buffer() { release(); }
    flat_buffer(flat_buffer&& o) noexcept
        : buf_(std::move(o.buf_)), cap_(std::exchange(o.cap_, 0)), begin_(std::exchange(o.begin_, 0)), end_(std::exchange(o.end_, 0)) {}
    flat_buffer& operator=(flat_buffer&&) = delete;
    std::string_view data() const { return {buf_.get() + begin_, end_ - begin_}; }
    std::size_t size() const { return end_ - begin_; }
    bool empty() const { return begin_ == end_; }
    void consume(std::size_t n) {
        begin_ += n;
        if (begin_ == end_) begin_ = end_ = 0;
    }
    /// Writable space of at least `want` bytes (up to `max` total capacity when growing).
    char* prepare(std::size_t want, std::size_t& got) {
        if (cap_ - end_ < want && begin_ > 0) {
            std::memmove(buf_.get(), buf_.get() + begin_, end_ - begin_);
            end_ -= begin_;
            begin_ = 0;
        }
        if (cap_ - end_ < want) reserve(end_ + want);
        got = cap_ - end_;
        return buf_.get() + end_;
    }
    void commit(std::size_t n) { end_ += n; }
    std::size_t capacity() const { return cap_; }
    /// Gives the memory back while the connection idles (only when it is larger than
    /// `keep`: a small buffer is cheaper to keep than to allocate again per request).
    void release(std::size_t keep = 0) {
        if (empty() && cap_ > keep) {
            if (buf_ && cap_ == block_cache::block) block_cache::give(std::move(buf_));
            buf_.reset();
            cap_ = begin_ = end_ = 0;
        }
    }

private:
    void reserve(std::size_t n) {
        if (n <= cap_) return;
        std::size_t cap = cap_ ? cap_ : 4096;
        while (cap < n) cap *= 2;
        // Not zeroed: a pump writes what it reads, and untouched pages of a large buffer
        // never become resident.
        auto nb = cap == block_cache::block ? block_cache::take() : std::make_unique_for_overwrite<char[]>(cap);
        if (end_ > begin_) std::memcpy(nb.get(), buf_.get() + begin_, end_ - begin_);
        end_ -= begin_;
        begin_ = 0;
        if (buf_ && cap_ == block_cache::block) block_cache::give(std::move(buf_));
        buf_ = std::move(nb);
        cap_ = cap;
    }
    std::unique_ptr<char[]> buf_;
    std::size_t cap_ = 0, begin_ = 0, end_ = 0;
};

}  // namespace dmz::proxy
